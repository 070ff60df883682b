"""One module per capability: a flow reads desired state, plans, gates, acts, reports."""
