"""The command line every script shares: a bad argument ends in one line, `error: ...`, and numbers
are checked when parsed (positive sizes, finite rates, probabilities in [0, 1])."""
import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends in one line on stderr, `error: ...`, like every other error."""

    def error(self, message):
        sys.exit(f"error: {message}")


def checked(kind, ok, what: str):
    """An argparse type: text -> a finite kind (int or float) for which ok(value) holds, else an
    error saying that the argument must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda x: x > 0, "an integer > 0")
count = checked(int, lambda x: x >= 0, "an integer >= 0")
positive = checked(float, lambda x: x > 0, "a finite number > 0")
nonnegative = checked(float, lambda x: x >= 0, "a finite number >= 0")
fraction = checked(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
