"""The GraphQL API (strawberry), mounted at /graphql."""
