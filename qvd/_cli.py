"""
What every qvd command-line program shares: errors in one line.

    parser = ArgumentParser(prog="qvd-di")     # a usage error: one line, exit 2
    except Exception as e:
        print(unexpected("qvd-di", e), file=sys.stderr)   # one line; QVD_DEBUG=1: traceback

Imports only the standard library.
"""

import argparse
import os
import traceback

#: Set (to anything) in the environment to get the traceback of an unexpected error.
DEBUG_VARIABLE = "QVD_DEBUG"


class ArgumentParser(argparse.ArgumentParser):
    """
    argparse, with a usage error printed as one line (C{PROG: MESSAGE (see
    'PROG --help')}) and exit status 2, instead of the usage text and the message.
    Its subparsers are of the same class.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def unexpected(prog, error, environ=None):
    """
    The text for an error C{prog} did not foresee (an exception or a
    Twisted Failure): one line naming it; with C{QVD_DEBUG} set in
    C{environ} (default the process environment), its traceback after it.
    """
    if hasattr(error, "getTraceback"):       # a twisted Failure
        name, text = error.type.__name__, error.getErrorMessage()
        details = error.getTraceback
    else:
        name, text = type(error).__name__, str(error)
        details = lambda: "".join(traceback.format_exception(error))   # noqa: E731
    line = (f"{prog}: unexpected error: {name}: {' '.join(text.split())} "
            f"(set {DEBUG_VARIABLE}=1 for the traceback)")
    if (os.environ if environ is None else environ).get(DEBUG_VARIABLE):
        return line + "\n" + details().rstrip("\n")
    return line
