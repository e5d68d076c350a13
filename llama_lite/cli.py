"""What the command-line scripts share: running a fire command with users' exit codes."""

import sys


def run(command) -> None:
    """`fire.Fire(command)`, with bad input as one `error: ...` line and exit 2, Ctrl-C as 130."""
    import fire

    args = sys.argv[1:]
    if "--" not in args:
        # Fire reads a lone "-" as its command separator; "-" here means stdin, so pick another.
        args += ["--", "--separator", "\x1f"]
    try:
        fire.Fire(command, command=args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
