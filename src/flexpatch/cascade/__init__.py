"""Segment-then-segment: a rough network on the downscaled image finds crops for a fine network."""
