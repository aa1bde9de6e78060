"""Toy model variants that tests add from outside the library, as a researcher would."""
