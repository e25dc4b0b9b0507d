from flexkd.cli import console_main

console_main()
