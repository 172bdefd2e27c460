"""Cameras and arms (no torch): protocols, RealSense and franky drivers, offline stand-ins."""
