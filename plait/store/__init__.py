"""plait.store"""
