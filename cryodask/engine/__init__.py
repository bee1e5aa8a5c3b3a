"""The machinery beneath every step: how a client is made, blocks and their done-marks, output locks,
the block runner and the collection runner."""
