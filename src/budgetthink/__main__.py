from budgetthink.cli import main

main()
