"""The bad-input campaign (issue 15): real fixtures, mutated, fed to every command that reads them."""
