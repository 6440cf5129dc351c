"""Example services shipped with malla, so the README's tour runs from an
installed wheel: `malla node n1 --service malla.examples.calculator:Calculator`."""
