//! Connection drivers (being written).
