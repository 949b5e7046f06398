"""Lab accounts: API keys, their users, and the gateway tokens issued to them."""
