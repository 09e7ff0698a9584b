"""Published Medusa head checkpoints: the layout table, the file readers, and the head plan."""
