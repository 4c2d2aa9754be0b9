"""RedPajama on Ray: reading and validation, dedup (quality filters, decontamination, exact and near-duplicates),
the tokenizer, and tokenizing and packing into training shards; every step a set of ledgered Ray tasks."""
