"""The installed ``oblivion`` command (oblivion/cli.py) and the shipped configs (oblivion/configs -> configs/)."""
