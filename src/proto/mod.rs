//! Sans-IO protocol core (being written).
