"""Symbolic music: rendering ABC tunes to MIDI, audio and piano rolls."""
