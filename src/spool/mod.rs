//! Held-mail journal and index (being written).
