"""plait.pipelines"""
