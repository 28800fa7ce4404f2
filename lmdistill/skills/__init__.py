"""Skills a student is distilled for beyond plain chat: tool use (tools.py), reasoning."""
