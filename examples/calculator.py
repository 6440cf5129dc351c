"""The tour's service now ships inside the package (malla/examples/calculator.py);
this name keeps `--service examples.calculator:Calculator` working in a checkout."""

from malla.examples.calculator import Calculator

__all__ = ["Calculator"]
