"""The command line: `serve`, operator commands, client configuration, start-up checks."""
