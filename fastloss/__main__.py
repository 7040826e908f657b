"""``python -m fastloss``: print what this installation runs (fastloss._report)."""

from fastloss._report import report

if __name__ == "__main__":
    print(report())
