from geoloc.cli import main

main()
