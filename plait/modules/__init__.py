"""plait.modules"""
