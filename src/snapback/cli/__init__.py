"""The command line: parse, call a service, print (text or ``--format json``)."""
