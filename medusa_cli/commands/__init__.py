"""One entry function per `medusa` command, each taking a request dataclass and returning a
result dataclass; cli.py parses flags into the request and renders the result."""
