"""plait.retrievers"""
