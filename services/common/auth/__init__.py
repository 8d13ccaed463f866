"""Who may call what: API keys and their scopes (api_keys.py), the credentials services give each other and TLS
(peers.py), secrets read from files or the environment (secret_files.py), and the flags every service shares
(flags.py). Plain Python beside gRPC's credential objects; the gateway's checks live in services/gateway/access.py."""
