"""Exception types shared by every command; each carries the exit status of DESIGN's table.

The library raises these; only dtools.cli prints them and turns them into exit codes.
"""

EX_OK = 0
EX_FAILED = 1  # some inputs failed, the rest were processed
EX_USAGE = 2  # usage or configuration error
EX_SOFTWARE = 70  # a bug in dtools (internal error)
EX_UNAVAILABLE = 69  # a remote service is unreachable or refused us
EX_TEMPFAIL = 75  # interrupted midway; rerunning finishes the job
EX_INTERRUPTED = 130  # Ctrl-C
EX_PIPE = 141  # stdout closed by the reader (128 + SIGPIPE)
EX_TERMINATED = 143  # SIGTERM


class DtoolsError(Exception):
    """Base class: the message is one line that says what went wrong and what to do next."""

    exit_code = EX_FAILED


class UsageError(DtoolsError):
    exit_code = EX_USAGE


class ConfigError(DtoolsError):
    exit_code = EX_USAGE


class InputError(DtoolsError):
    """One input (file, record, envelope) is bad; the command reports it and continues."""

    exit_code = EX_FAILED


class RemoteError(DtoolsError):
    """A remote service (IMAP server, DICOM peer) is unreachable or refused us."""

    exit_code = EX_UNAVAILABLE


class TempFailure(DtoolsError):
    """Interrupted midway; running the same command again finishes the job."""

    exit_code = EX_TEMPFAIL
