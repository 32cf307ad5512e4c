"""The subcommands of ``raytrain``, one module each: ``add_parser(sub)`` adds its parser (and
sets ``run``), ``run(args)`` runs it and returns the exit code. A command turns its arguments
into a Config or a request, reports errors as one line (``args.error``) and calls the capability
packages (raytrain.train, .data, .report, .inference, .sweep) for the work.

``args`` holds what every parser shares. A command may import any package below it, and
``args``; never another command, nor raytrain.cli.
"""
