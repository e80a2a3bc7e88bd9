"""Thin servicers: protobuf -> domain call -> protobuf."""
