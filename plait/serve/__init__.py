"""plait.serve"""
