"""Engine integrations. Each module imports its engine lazily, on first use."""
