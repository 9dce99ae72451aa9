"""Adapters for the device's hardware: audio in and out, buttons and LEDs."""
