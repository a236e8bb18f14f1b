"""Data stages: problem files (`budgetthink data generate/score`), teacher traces and s1K-style curation."""
