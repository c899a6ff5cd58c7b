"""What lives where: partition plans, memory accounting and the fixed policies."""
