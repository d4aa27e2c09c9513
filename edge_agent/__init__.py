"""The edge agent: the program every device runs (register, poll, download, train, upload); imports the core and the
contract, never a service."""
