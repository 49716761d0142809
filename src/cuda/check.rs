//! `lift gpu-check` (filled in below).
