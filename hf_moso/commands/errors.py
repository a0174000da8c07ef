"""Exit codes of the `hf-moso` command and the error that marks invalid input."""

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_SUCCESS}    success
  {EXIT_FAILURE}    unexpected failure (for example out of memory or a full disk); --debug prints the traceback
  {EXIT_USAGE}    invalid command line (unknown option, missing argument)
  {EXIT_INVALID_INPUT}    invalid input: dataset, labels, model, snapshots, partial results, keep value, output folder
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); rerun the same command to resume scoring"""


class InvalidInputError(ValueError):
    """An input of the command (a path, a dataset, a value) is invalid; the message names it and the fix."""
