"""De-identification (PS3.15 Annex E) for danon: the profile table, keyed pseudonyms, the mapping table."""
