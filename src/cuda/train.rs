//! GPU training state (filled in below).
