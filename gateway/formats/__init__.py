"""Pure translations between the gateway's wire formats and OpenAI chat, tested without a server."""
