"""Research tools: privacy audits (membership inference, memorisation) of released artifacts."""
