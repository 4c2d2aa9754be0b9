"""RedPajama on Ray Data: reading and validation, the tokenizer, tokenizing and packing into training shards."""
