from calibexport.cli.app import main

main()
