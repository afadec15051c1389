"""The error every subcommand raises for a problem with what the user asked for."""

EXIT_USER_ERROR = 2


class CliError(Exception):
    """A problem with what the user asked for; printed as one line."""
