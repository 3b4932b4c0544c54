"""One module per `spnet` verb. Each defines NAME, HELP, ``add_arguments(parser)`` and ``run(args)``.

``run`` returns a dict (printed as the final JSON line), an int (exit code) or None. Add a verb by adding a
module here and its name to COMMANDS.
"""
COMMANDS = ["train", "eval", "make_tiny", "ui", "submit", "jobs"]
COMMANDS += ["prepare_imagenet", "check_data"]
COMMANDS += ["frontier"]
