from RL.config.cli import main

main()
