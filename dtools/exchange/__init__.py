"""The exchange state of a site: what it sealed, deposited, received, opened and owes, per peer."""
