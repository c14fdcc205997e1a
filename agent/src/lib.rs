//! The tokenfleet fleet agent (being written).
